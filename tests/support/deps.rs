//! What the tests need beyond Rust (ZooKeeper, Java, `ss`, `promtool`, ...), installed once per
//! test binary by `tests/deps.sh`, the list that `.ci/run` installs from too.

use std::process::Command;
use std::sync::OnceLock;

/// Installs whatever `tests/deps.sh` lists and this machine lacks; panics with the reason if it
/// cannot.
pub fn ensure() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/deps.sh");
        let status = Command::new(script).status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "{script} could not install what the tests need: {status:?}"
        );
    });
}
