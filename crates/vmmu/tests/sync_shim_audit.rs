//! Issue 7 point 1: every atomic, lock, cell and wait loop of the core goes through `crate::sync`
//! (core's types normally, loom's under `--cfg loom`), so the loom models run the real code and
//! not a copy of it. This test reads the core's sources and fails on any synchronisation
//! primitive taken from elsewhere outside `src/sync.rs` (test modules may use std threads).

use std::path::{Path, PathBuf};

/// Paths that bypass the shim.
const FORBIDDEN: &[&str] = &[
    "core::sync::",
    "std::sync::",
    "alloc::sync::",
    "core::cell::",
    "std::cell::",
    "core::hint::spin_loop",
    "std::thread::",
    "parking_lot",
    "spin::",
];

/// Uses that are not synchronisation, each with its reason: `(file name, pattern, why)`.
const ALLOWED: &[(&str, &str, &str)] = &[
    (
        "shadow/dirty.rs",
        "core::cell::Cell",
        "one dirty-log call's protector remembering that it counted itself in \
         unflushed_write_protects (not Sync: on one stack)",
    ),
    (
        "testing.rs",
        "core::cell::Cell",
        "the slow test host's per-thread delay setting (a thread-local, std only, never loom)",
    ),
    (
        "testing.rs",
        "core::cell::RefCell",
        "the test host's per-thread preemption-point hook (a thread-local, std only, never loom)",
    ),
    (
        "testmem.rs",
        "core::cell::RefCell",
        "the guest walker's single-threaded test memory (a map of gPTEs, never shared)",
    ),
    (
        "vm.rs",
        "core::cell::Cell",
        "one memslot update's mn_lock guard, handed from its wait to its first publication on the same thread",
    ),
    (
        "guest_mem.rs",
        "core::cell::Cell",
        "the last slot one fault's guest-memory view looked up (the view is !Sync, on one stack)",
    ),
    (
        "testing.rs",
        "std::thread::sleep",
        "the slow test host's delay of a table lookup (a delay, not a wait for another thread)",
    ),
    (
        "mod.rs",
        "core::sync::atomic::AtomicBool",
        "mmu_core's loom-only switches (`loom_knobs`) that remove a step a model checks, set outside models",
    ),
    (
        "walk.rs",
        "core::sync::atomic::Ordering::Relaxed",
        "the reads of those loom-only switches (cfg(loom), outside what the models check)",
    ),
    (
        "fault_path.rs",
        "core::sync::atomic::Ordering::Relaxed",
        "the read of tdp's loom-only switch that skips the table-in-the-way staleness re-check",
    ),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn core_uses_only_the_sync_shim() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files under {src:?}", files.len());
    let mut bad = Vec::new();
    for f in files.iter().filter(|f| !f.ends_with("sync.rs")) {
        let text = std::fs::read_to_string(f).unwrap();
        // Unit-test modules sit at the end of each file; they may spawn std threads.
        let code = text
            .find("#[cfg(test)]")
            .into_iter()
            .chain(text.find("#[cfg(all(test"))
            .min()
            .map_or(&text[..], |i| &text[..i]);
        for (n, line) in code.lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") {
                continue;
            }
            for pat in FORBIDDEN {
                if l.contains(pat)
                    && !ALLOWED.iter().any(|(file, p, _)| f.ends_with(file) && l.contains(p))
                {
                    bad.push(format!("{}:{}: {}", f.display(), n + 1, l));
                }
            }
        }
    }
    assert!(bad.is_empty(), "synchronisation outside crate::sync:\n{}", bad.join("\n"));
}

/// The modules that store into table pages (SPTEs of TDP and shadow tables).
const TABLE_MODULES: &[&str] = &[
    "mmu_core/change.rs",
    "mmu_core/walk.rs",
    "tdp/dirty.rs",
    "tdp/map.rs",
    "tdp/root.rs",
    "tdp/zap.rs",
    "shadow",
];

/// A type-stable host's leaf-table cache hit reads table memory with no read section and relies
/// on every store into a table page being `Release` (`src/mmu_core/walk.rs`, "Type-stable hosts"):
/// no store, swap, read-modify-write or compare-and-swap success ordering in the modules that
/// write table entries may be `Relaxed`.
#[test]
fn table_stores_are_release() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let table_files: Vec<_> = files
        .iter()
        .filter(|f| {
            let rel = f.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
            TABLE_MODULES.iter().any(|m| rel.starts_with(m))
        })
        .collect();
    for m in TABLE_MODULES {
        assert!(
            table_files.iter().any(|f| {
                let rel = f.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
                rel.starts_with(m)
            }),
            "no source file for {m}: the list names a module that moved"
        );
    }
    let writes = [".store(", ".swap(", ".fetch_", ".compare_exchange"];
    let mut bad = Vec::new();
    for f in table_files {
        let text = std::fs::read_to_string(f).unwrap();
        // Statements can span lines: judge each from its write call to the next `;`.
        for (at, _) in text.match_indices('.') {
            let rest = &text[at..];
            if !writes.iter().any(|w| rest.starts_with(w)) {
                continue;
            }
            let stmt = &rest[..rest.find(';').unwrap_or(rest.len())];
            // The first ordering is the store's (or the success ordering of a compare-and-swap);
            // a compare-and-swap's failure ordering is a load.
            let first = stmt.find("Ordering::").map(|i| &stmt[i..]);
            if first.is_some_and(|o| o.starts_with("Ordering::Relaxed")) {
                let line = text[..at].lines().count();
                bad.push(format!("{}:{line}: {}", f.display(), stmt.lines().next().unwrap_or("")));
            }
        }
    }
    assert!(bad.is_empty(), "Relaxed stores into table memory:\n{}", bad.join("\n"));
}
