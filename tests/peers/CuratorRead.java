// Reads a service's instances with Curator's own ServiceDiscovery, as a plain Curator consumer
// does: an Object payload, Curator's JSON serializer. Prints one line per instance
// ("address:port enabled=... payload=...") and exits 0, or prints the error and exits 1.
//
//   java -cp <curator, zookeeper, jackson, guava, slf4j jars> CuratorRead.java CONNECT BASE_PATH SERVICE

import java.util.Collection;

import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.RetryNTimes;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;

public class CuratorRead {
    public static void main(String[] args) throws Exception {
        try (CuratorFramework client = CuratorFrameworkFactory.newClient(args[0], new RetryNTimes(3, 200))) {
            client.start();
            if (!client.blockUntilConnected(20, java.util.concurrent.TimeUnit.SECONDS)) {
                throw new IllegalStateException("cannot reach ZooKeeper at " + args[0]);
            }
            ServiceDiscovery<Object> discovery = ServiceDiscoveryBuilder.builder(Object.class)
                .client(client)
                .basePath(args[1])
                .serializer(new JsonInstanceSerializer<>(Object.class))
                .build();
            discovery.start();
            Collection<ServiceInstance<Object>> instances = discovery.queryForInstances(args[2]);
            for (ServiceInstance<Object> i : instances) {
                System.out.println(i.getAddress() + ":" + i.getPort() + " enabled=" + i.isEnabled() + " payload=" + i.getPayload());
            }
            discovery.close();
        } catch (Exception e) {
            System.out.println("error: " + e);
            System.exit(1);
        }
    }
}
