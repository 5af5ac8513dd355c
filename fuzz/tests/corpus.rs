//! Replays every committed input of every fuzz target through the target's checks, in the normal
//! test suite: the seed corpora (`corpus/TARGET/`) and each crash a fuzzer found
//! (`regressions/TARGET/`, named after what it found), which must pass now.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::path::{Path, PathBuf};

use cprd_fuzz::targets;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("state_stream", targets::state_stream),
    ("wire_message", targets::wire_message),
    ("qmp_session", targets::qmp_session),
    ("vm_definition", targets::vm_definition),
    ("settings", targets::settings),
    ("runtime_record", targets::runtime_record),
    ("fdstore_state", targets::fdstore_state),
    ("state_formats", targets::state_formats),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(kind);
    let mut count = 0;
    for (name, target) in TARGETS {
        for file in inputs(&root.join(name)) {
            let data = std::fs::read(&file).expect("read an input");
            eprintln!("{name}: {}", file.display());
            target(&data);
            count += 1;
        }
    }
    count
}

#[test]
fn every_seed_of_every_target_passes_its_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, _) in TARGETS {
        assert!(!inputs(&root.join(name)).is_empty(), "target {name} has no committed seeds");
    }
    assert!(replay("corpus") >= TARGETS.len());
}

#[test]
fn every_crash_the_fuzzers_found_passes_now() {
    replay("regressions");
}
