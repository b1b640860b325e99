//! Links the agent's code in the order of `symbol-order.txt`: what it runs at start, at rest
//! and for QGA first and together, so that the kernel's fault-around (64 KiB around each page
//! fault) maps little code that never runs. `cargo xtask agent-order` regenerates the file;
//! see docs/PERFORMANCE.md. Release-based profiles only (the shipped agent's is one): debug
//! builds have other symbols.

fn main() {
    const ORDER: &str = "symbol-order.txt";
    println!("cargo:rerun-if-changed={ORDER}");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if !release || !linux {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let order = std::path::Path::new(&dir).join(ORDER);
    // lld: the toolchain's own (rustc's default linker on x86_64 Linux since 1.90), or
    // Debian's (x.sh setup) for an older rustc. Symbols of the file that a build lacks (code
    // changed since the profile) are skipped without a warning each.
    for arg in [
        "-fuse-ld=lld".to_owned(),
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ] {
        println!("cargo:rustc-link-arg-bin=vstream-agent={arg}");
    }
}
