//! Link settings for the `edgevec` and `bench` binaries.
//!
//! When built for the machine that builds it, on Linux with glibc 2.36 or
//! newer, relative relocations are packed (`-z pack-relative-relocs`,
//! DT_RELR): the table the loader walks at every start shrinks from about
//! 1.3 MB to about 20 KB, and with it the file pages a node keeps
//! resident for it (BENCHMARKS.md, "Memory and disk per node"). The
//! linker marks such a binary as needing glibc's `GLIBC_ABI_DT_RELR`,
//! which older glibc lacks, so the option is left out there and when
//! building for another machine (whose glibc the build cannot see).

/// The version of the glibc this build script runs on, as (major, minor).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn host_glibc() -> Option<(u32, u32)> {
    use std::ffi::{c_char, CStr};
    extern "C" {
        fn gnu_get_libc_version() -> *const c_char;
    }
    // SAFETY: glibc returns a pointer to a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(gnu_get_libc_version()) }.to_str().ok()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Not glibc: nothing to ask.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn host_glibc() -> Option<(u32, u32)> {
    None
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let native = var("HOST") == var("TARGET");
    let glibc = var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if native && glibc && host_glibc().is_some_and(|v| v >= (2, 36)) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
