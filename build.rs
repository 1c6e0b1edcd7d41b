//! Link settings for the `edgevec` and `bench` binaries.
//!
//! On Linux with glibc, relative relocations are packed (`-z
//! pack-relative-relocs`, the DT_RELR format of glibc 2.36 and binutils
//! 2.38): the table the loader walks at every start shrinks from about
//! 1.3 MB to about 20 KB, and with it the file pages a node keeps
//! resident for it (BENCHMARKS.md, "Memory and disk per node"). A linker
//! that does not know the option warns and links as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
