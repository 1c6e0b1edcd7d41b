//! Compiling a plugin in a child process with a memory limit.
//!
//! A hostile module that passes every deploy-time check can still make
//! Cranelift use gigabytes; inside the node that would take the node down.
//! A node therefore compiles plugins that are not its own by running its
//! own binary (`edgevec plugin-compile`, hidden) as a child: the child caps
//! its address space with `RLIMIT_AS`, reads the plugin from stdin, checks
//! it and makes it a component as the deploy does ([`super::validate`]), and
//! writes wasmtime's serialized artifact to stdout. The parent kills it at
//! [`COMPILE_TIMEOUT`](super::COMPILE_TIMEOUT).
//!
//! Invariants:
//! - the child is the node's own executable with the same engine
//!   configuration, so the artifact is compatible; the parent still
//!   deserializes it only after checking it is a wasmtime artifact of
//!   this engine (wasmtime checks its header and compatibility);
//! - what the child writes is bounded ([`MAX_ARTIFACT_BYTES`]) before it
//!   is kept;
//! - a child that is killed, runs out of memory or fails is a
//!   [`PluginError::Compile`] that says which.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{PluginError, PolicyEngine};

/// Address space the compiling child may use.
pub const COMPILE_MEMORY_BYTES: u64 = 1 << 30;
/// Largest plugin the child reads from stdin.
const MAX_INPUT_BYTES: u64 = super::MAX_PLUGIN_BYTES as u64;
/// Largest artifact the parent accepts from the child.
pub const MAX_ARTIFACT_BYTES: u64 = 256 * 1024 * 1024;
/// The hidden subcommand of the `edgevec` binary that compiles.
pub const SUBCOMMAND: &str = "plugin-compile";
/// Exit code of a child that refused the component (the reason is on
/// stderr).
const EXIT_REFUSED: i32 = 3;

/// Runs `exe plugin-compile --memory-bytes LIMIT` on `plugin` (the bytes
/// as deployed) and returns the serialized artifact.
pub fn in_child(exe: &Path, plugin: &[u8], memory_bytes: u64, timeout: Duration) -> Result<Vec<u8>, PluginError> {
    let err = |m: String| PluginError::Compile(m);
    let mut child = Command::new(exe)
        .arg(SUBCOMMAND)
        .arg("--memory-bytes")
        .arg(memory_bytes.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .spawn()
        .map_err(|e| err(format!("could not start the compiler {}: {e}", exe.display())))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = plugin.to_vec();
    let writer = std::thread::spawn(move || {
        // A child that dies early closes its end: that is reported by its
        // exit status, not here.
        let _ = stdin.write_all(&input);
    });
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stdout.take(MAX_ARTIFACT_BYTES + 1).read_to_end(&mut out).map(|_| out)
    });
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.take(8 * 1024).read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!(
                    "compiling took longer than {timeout:?}; the compiler was stopped"
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(err(format!("waiting for the compiler: {e}"))),
        }
    };
    let _ = writer.join();
    let out = reader
        .join()
        .map_err(|_| err("compiler output reader failed".into()))?
        .map_err(|e| err(format!("reading the compiler's output: {e}")))?;
    let message = errors.join().unwrap_or_default();
    let message = message.trim();
    if status.success() {
        if out.len() as u64 > MAX_ARTIFACT_BYTES {
            return Err(err(format!("compiled artifact is above {MAX_ARTIFACT_BYTES} bytes")));
        }
        return Ok(out);
    }
    if status.code() == Some(EXIT_REFUSED) {
        return Err(err(message.to_string()));
    }
    let how = match status.code() {
        Some(code) => format!("exit code {code}"),
        None => {
            use std::os::unix::process::ExitStatusExt;
            format!("signal {}", status.signal().unwrap_or(0))
        }
    };
    Err(err(format!(
        "the compiler failed ({how}) within its {} MiB memory limit{}{message}",
        memory_bytes >> 20,
        if message.is_empty() { "" } else { ": " }
    )))
}

/// The child's side: lowers its priority (nice 10, as index builds),
/// caps the address space, reads a plugin from stdin, writes its compiled
/// artifact to stdout. Returns the exit code.
pub fn child_main(memory_bytes: u64) -> i32 {
    // Compiling is background work: it must not starve the node's Raft
    // and network threads on a small machine.
    edgevec_engine::lower_priority();
    let limit = libc::rlimit {
        rlim_cur: memory_bytes,
        rlim_max: memory_bytes,
    };
    // SAFETY: setrlimit only reads the struct passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        eprintln!("could not limit memory: {}", std::io::Error::last_os_error());
        return 1;
    }
    let mut plugin = Vec::new();
    if let Err(e) = std::io::stdin().take(MAX_INPUT_BYTES + 1).read_to_end(&mut plugin) {
        eprintln!("reading the component: {e}");
        return 1;
    }
    if plugin.len() as u64 > MAX_INPUT_BYTES {
        eprintln!("plugin is above {MAX_INPUT_BYTES} bytes");
        return EXIT_REFUSED;
    }
    let engine = match PolicyEngine::new(super::HostInputs::Live) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    // The plugin as deployed (a core module or a component): checked and
    // made a component here as well, so this command takes any plugin file.
    let component = match super::validate::check(&plugin) {
        Ok(checked) => checked.component,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_REFUSED;
        }
    };
    match engine.engine.precompile_component(&component) {
        Ok(artifact) => match std::io::stdout().lock().write_all(&artifact) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("writing the artifact: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("{e:#}");
            EXIT_REFUSED
        }
    }
}

static COMPILER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes this process compile plugins by running `exe` (a binary with
/// the [`SUBCOMMAND`]); the `edgevec` binary names itself at start.
pub fn set_compiler(exe: PathBuf) {
    let _ = COMPILER.set(exe);
}

/// The executable set by [`set_compiler`], if any; without one, plugins
/// are compiled in this process (tests, benchmarks).
pub fn compiler() -> Option<&'static Path> {
    COMPILER.get().map(PathBuf::as_path)
}
