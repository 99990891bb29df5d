//! Replays every input in `fuzz/corpus/<target>/` (seeds plus what fuzzing found) through the
//! same invariants, so CI checks them without libFuzzer.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        let data = std::fs::read(&path).expect("read corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{} breaks the {target} invariants",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "no corpus for {target}");
}

#[test]
fn respond_corpus_keeps_the_round_trip_invariants() {
    replay("respond", vmesh_fuzz::respond);
}

#[test]
fn name_table_corpus_keeps_the_image_invariants() {
    replay("name_table", vmesh_fuzz::name_table);
}

#[test]
fn tunnel_corpus_keeps_the_framing_invariants() {
    replay("tunnel", vmesh_fuzz::tunnel);
}

#[test]
fn forward_corpus_keeps_the_stream_invariants() {
    replay("forward", vmesh_fuzz::forward);
}
