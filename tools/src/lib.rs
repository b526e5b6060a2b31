//! lapse-tools: what measures and exercises lapse from outside, as a client of
//! its library and its binary. Nothing here is part of the product binary.
//!
//! * `bench`: the benchmarks (`scripts/bench`);
//! * `simulate`: the clinic population simulator and the demo's report (`scripts/demo`);
//! * `sample`: a few sample events of all five kinds, for trying lapse by hand.

pub mod bench;
pub mod sample;
pub mod simulate;

/// The tools run from the repository root (`scripts/` starts them there, and a
/// config's `schema.dir` defaults to `schemas` under it); cargo starts this
/// crate's tests in `tools/`. The same directory for every test, so tests that
/// share a process may all call it.
#[cfg(test)]
pub(crate) fn run_from_repo_root() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    std::env::set_current_dir(root.expect("tools/ lies in the repository"))
        .expect("cd to the repository root");
}
