//! Helpers shared by the `vmmu` command tests: run the binary, name repository files, make
//! temporary files, read JSON reports, and ask whether `/dev/kvm` can run the KVM half.
//!
//! Each test binary uses its own subset, hence `dead_code` is allowed here.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

/// `vmmu ARGS`, waited for, its output captured.
pub fn vmmu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmmu")).args(args).output().expect("run vmmu")
}

/// A path in the repository, from its root (`tests/traces/...`).
pub fn repo(rel: &str) -> String {
    format!("{}/../../{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// Bytes of a child's output as text, invalid UTF-8 replaced.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// This test process's own temporary directory (made on first use).
fn process_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmu-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("make a temporary directory");
    d
}

/// A file named `name` holding `contents`, in this process's temporary directory.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    let p = process_dir().join(name);
    std::fs::write(&p, contents).expect("write a temporary file");
    p
}

/// A fresh, empty directory named `name` in this process's temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = process_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("make a temporary directory");
    d
}

/// The child's stdout as JSON; panics showing stdout and stderr when it is not.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}): {}{}", text(&out.stdout), text(&out.stderr))
    })
}

/// A count in a JSON report.
pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Why `/dev/kvm` cannot run the KVM half here, or `None` where it can.
pub fn kvm_unusable() -> Option<String> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        vmmu_kvm::probe().err()
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        Some("needs Linux on x86-64".into())
    }
}

/// Whether `/dev/kvm` can run the KVM half; where not, prints `{doing_without}: {why}` so the
/// test log says what was left unchecked.
pub fn kvm_usable(doing_without: &str) -> bool {
    match kvm_unusable() {
        None => true,
        Some(why) => {
            println!("{doing_without}: {why}");
            false
        }
    }
}
