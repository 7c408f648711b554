//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built by a different compiler for a different target, so
//! cargo cannot build it as a dependency; this script only finds it and fails
//! with the command to run when it is missing.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=POLARSTACK_EBPF_OBJECT");
    if env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }
    let object = env::var_os("POLARSTACK_EBPF_OBJECT").map(PathBuf::from).unwrap_or_else(|| {
        let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
        manifest.join("../target/bpf/polarstack.bpf.o")
    });
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nThe eBPF object {} is missing.\n\
             Build it first:            cargo xtask build-ebpf\n\
             or build a snapshot-only daemon (no eBPF, resyncs by sock_diag alone):\n\
             \tcargo build -p polarstack-daemon --no-default-features\n\n",
            object.display()
        );
    }
    // A build script's failure is a panic; the path was just found a file.
    let object = object.canonicalize().unwrap_or(object);
    println!("cargo:rustc-env=POLARSTACK_EBPF_OBJECT={}", object.display());
}
