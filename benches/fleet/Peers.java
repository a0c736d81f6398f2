// The peers' ways of following service nodes, for benches/fleet: COUNT watchers in one JVM, each
// with a ZooKeeper session of its own and following every service under BASE.
//
//   java Peers curator|relist CONNECT BASE COUNT SESSION_TIMEOUT_MS
//
// curator: Curator's ServiceDiscovery with a ServiceCache per service (what Curator-based clients
//          such as Spring Cloud Zookeeper use).
// relist:  what SmartStack Synapse's ZooKeeper watcher does on every event of a service: exists and
//          getChildren on the service node (both setting watches), then getData of every child.
//
// Prints "ready" once every watcher holds every service, then "seen WATCHER INSTANCES" whenever a
// watcher's view changes; exits when standard input closes.

import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicInteger;

import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.state.ConnectionState;
import org.apache.curator.retry.ExponentialBackoffRetry;
import org.apache.curator.x.discovery.ServiceCache;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;
import org.apache.curator.x.discovery.details.ServiceCacheListener;
import org.apache.zookeeper.KeeperException;
import org.apache.zookeeper.Watcher;
import org.apache.zookeeper.ZooKeeper;

public final class Peers {
    static void sleep(long ms) {
        try {
            Thread.sleep(ms);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    static synchronized void say(String line) {
        System.out.println(line);
        System.out.flush();
    }

    public static void main(String[] args) throws Exception {
        String mode = args[0];
        String connect = args[1];
        String base = args[2];
        int count = Integer.parseInt(args[3]);
        int timeoutMs = Integer.parseInt(args[4]);
        for (int i = 0; i < count; i++) {
            if (mode.equals("curator")) {
                curator(i, connect, base, timeoutMs);
            } else {
                new Relist(i, connect, base, timeoutMs).start();
            }
        }
        say("ready");
        while (System.in.read() != -1) {
            // Runs until the bench closes the pipe.
        }
        System.exit(0);
    }

    static void curator(int index, String connect, String base, int timeoutMs) throws Exception {
        CuratorFramework client = CuratorFrameworkFactory.builder()
                .connectString(connect)
                .sessionTimeoutMs(timeoutMs)
                .retryPolicy(new ExponentialBackoffRetry(100, 10))
                .build();
        client.start();
        client.blockUntilConnected();
        ServiceDiscovery<Object> discovery = ServiceDiscoveryBuilder.builder(Object.class)
                .client(client)
                .basePath(base)
                .serializer(new JsonInstanceSerializer<>(Object.class))
                .watchInstances(false)
                .build();
        discovery.start();
        List<ServiceCache<Object>> caches = new ArrayList<>();
        ServiceCacheListener listener = new ServiceCacheListener() {
            @Override
            public void cacheChanged() {
                int total = 0;
                synchronized (caches) {
                    for (ServiceCache<Object> c : caches) {
                        total += c.getInstances().size();
                    }
                }
                say("seen " + index + " " + total);
            }

            @Override
            public void stateChanged(CuratorFramework c, ConnectionState state) {}
        };
        for (String name : discovery.queryForNames()) {
            ServiceCache<Object> cache = discovery.serviceCacheBuilder().name(name).build();
            cache.start();
            synchronized (caches) {
                caches.add(cache);
            }
            cache.addListener(listener);
        }
    }

    static final class Relist {
        final int index;
        final String base;
        final ZooKeeper zk;
        final CountDownLatch connected = new CountDownLatch(1);
        final List<String> services = new ArrayList<>();
        final java.util.Map<String, Integer> sizes = new java.util.concurrent.ConcurrentHashMap<>();

        Relist(int index, String connect, String base, int timeoutMs) throws Exception {
            this.index = index;
            this.base = base;
            this.zk = new ZooKeeper(connect, timeoutMs, e -> {
                if (e.getState() == Watcher.Event.KeeperState.SyncConnected) {
                    connected.countDown();
                }
            });
        }

        void start() throws Exception {
            connected.await();
            services.addAll(zk.getChildren(base, false));
            for (String s : services) {
                discover(base + "/" + s);
            }
        }

        void discover(String path) {
            Watcher again = e -> {
                if (e.getType() != Watcher.Event.EventType.None) {
                    discover(path);
                }
            };
            for (int attempt = 1; ; attempt++) {
                try {
                    zk.exists(path, again);
                    List<String> children = zk.getChildren(path, again);
                    for (String child : children) {
                        zk.getData(path + "/" + child, false, null);
                    }
                    sizes.put(path, children.size());
                    break;
                } catch (KeeperException.ConnectionLossException e) {
                    // The client reconnects by itself: read again, as the zk gem's retries do.
                    if (attempt == 100) {
                        say("error " + index + " " + e);
                        return;
                    }
                    sleep(100);
                } catch (Exception e) {
                    say("error " + index + " " + e);
                    return;
                }
            }
            int total = 0;
            for (int n : sizes.values()) {
                total += n;
            }
            if (sizes.size() == services.size()) {
                say("seen " + index + " " + total);
            }
        }
    }
}
