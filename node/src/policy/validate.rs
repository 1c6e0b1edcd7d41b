//! Deploy-time checks of uploaded plugin bytes, before anything is
//! compiled: size and shape limits, a core module turned into a component
//! of the contract, and the component's imports and exports checked
//! against the contract's worlds. Every refusal says what was wrong.

use wasmparser::{Parser, Payload};
use wit_parser::Resolve;

use super::{Kind, PluginError, CONTRACT_MAJOR, MAX_FUNCTIONS, MAX_PLUGIN_BYTES};

/// The contract, as the node was built with it.
pub const CONTRACT_WIT: &str = include_str!("../../../wit/policy.wit");

const HOST: &str = "edgevec:policy/host";
const TYPES: &str = "edgevec:policy/types";
const BALANCER: &str = "edgevec:policy/balancer";
const CONSISTENCY: &str = "edgevec:policy/consistency";

/// A component ready to compile, and what it implements.
pub struct Checked {
    pub kind: Kind,
    pub component: Vec<u8>,
}

/// Checks `bytes` (a core module built against the contract, or a
/// component) and returns the component to compile.
pub fn check(bytes: &[u8]) -> Result<Checked, PluginError> {
    if bytes.len() > MAX_PLUGIN_BYTES {
        return Err(PluginError::TooLarge {
            bytes: bytes.len(),
            limit: MAX_PLUGIN_BYTES,
        });
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(PluginError::NotWasm(
            "it does not start with the WebAssembly magic bytes".into(),
        ));
    }
    let component = if wasmparser::Parser::is_component(bytes) {
        count_functions(bytes)?;
        bytes.to_vec()
    } else {
        let kind = inspect_module(bytes)?;
        componentize(bytes, kind)?
    };
    let kind = inspect_component(&component)?;
    Ok(Checked { kind, component })
}

/// Counts defined functions (of every nested module) against the limit;
/// a parse error refuses the bytes.
fn count_functions(bytes: &[u8]) -> Result<usize, PluginError> {
    let mut functions = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| PluginError::NotWasm(e.to_string()))?;
        if let Payload::FunctionSection(s) = payload {
            functions += s.count() as usize;
            if functions > MAX_FUNCTIONS {
                return Err(PluginError::TooManyFunctions {
                    functions,
                    limit: MAX_FUNCTIONS,
                });
            }
        }
    }
    Ok(functions)
}

/// What a core module implements, from its exports; refuses WASI and
/// foreign imports with their names.
fn inspect_module(bytes: &[u8]) -> Result<Kind, PluginError> {
    count_functions(bytes)?;
    let mut kind = None;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| PluginError::NotWasm(e.to_string()))? {
            Payload::ImportSection(s) => {
                for import in s.into_imports() {
                    let import = import.map_err(|e| PluginError::NotWasm(e.to_string()))?;
                    check_import_name(import.module, Some(import.name))?;
                }
            }
            Payload::ExportSection(s) => {
                for export in s {
                    let export = export.map_err(|e| PluginError::NotWasm(e.to_string()))?;
                    if let Some((iface, _)) = export.name.split_once('#') {
                        kind = kind.or(export_kind(iface)?);
                    }
                }
            }
            _ => {}
        }
    }
    kind.ok_or_else(|| {
        PluginError::WrongWorld(format!(
            "it exports neither {BALANCER}@{CONTRACT_MAJOR}.x nor {CONSISTENCY}@{CONTRACT_MAJOR}.x functions"
        ))
    })
}

/// Refuses an import that is not the contract's host interface.
fn check_import_name(module: &str, name: Option<&str>) -> Result<(), PluginError> {
    let what = match name {
        Some(n) => format!("{module}.{n}"),
        None => module.to_string(),
    };
    if module.starts_with("wasi") {
        return Err(PluginError::Import(format!(
            "it imports WASI ({what}): plugins get no WASI, only {HOST} (build for wasm32-unknown-unknown)"
        )));
    }
    let (iface, version) = module.split_once('@').unwrap_or((module, ""));
    if iface == HOST || iface == TYPES {
        return check_major(iface, version);
    }
    Err(PluginError::Import(format!(
        "it imports {what}, which the contract does not have (only {HOST})"
    )))
}

fn check_major(iface: &str, version: &str) -> Result<(), PluginError> {
    let major = version.split('.').next().unwrap_or("");
    if major == CONTRACT_MAJOR.to_string() {
        Ok(())
    } else {
        Err(PluginError::Version(format!(
            "it is built against {iface}@{version}; this node speaks {iface}@{CONTRACT_MAJOR}.x"
        )))
    }
}

/// The kind an exported interface name means (`None`: not the
/// contract's, ignored).
fn export_kind(name: &str) -> Result<Option<Kind>, PluginError> {
    let (iface, version) = name.split_once('@').unwrap_or((name, ""));
    let kind = match iface {
        BALANCER => Kind::LoadBalancer,
        CONSISTENCY => Kind::Consistency,
        _ => return Ok(None),
    };
    check_major(iface, version)?;
    Ok(Some(kind))
}

/// Turns a core module into a component of `kind`'s world; the module's
/// own `component-type` section (wit-bindgen writes one) is used when
/// present, else the node's copy of the contract is embedded.
fn componentize(bytes: &[u8], kind: Kind) -> Result<Vec<u8>, PluginError> {
    let has_metadata = Parser::new(0)
        .parse_all(bytes)
        .any(|p| matches!(p, Ok(Payload::CustomSection(c)) if c.name().starts_with("component-type")));
    let mut module = bytes.to_vec();
    if !has_metadata {
        let mut resolve = Resolve::default();
        let pkg = resolve
            .push_str("policy.wit", CONTRACT_WIT)
            .map_err(|e| PluginError::Internal(format!("the node's contract does not parse: {e}")))?;
        let world = resolve
            .select_world(&[pkg], Some(kind.world()))
            .map_err(|e| PluginError::Internal(e.to_string()))?;
        wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8)
            .map_err(|e| PluginError::Internal(e.to_string()))?;
    }
    wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| PluginError::WrongWorld(format!("it is not a component of the {} world: {e:#}", kind.world())))
}

/// The kind a component implements; its imports must be the contract's.
fn inspect_component(bytes: &[u8]) -> Result<Kind, PluginError> {
    let mut kind = None;
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| PluginError::NotWasm(e.to_string()))? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(s) if depth == 0 => {
                for import in s {
                    let import = import.map_err(|e| PluginError::NotWasm(e.to_string()))?;
                    check_import_name(import.name.name, None)?;
                }
            }
            Payload::ComponentExportSection(s) if depth == 0 => {
                for export in s {
                    let export = export.map_err(|e| PluginError::NotWasm(e.to_string()))?;
                    kind = kind.or(export_kind(export.name.name)?);
                }
            }
            _ => {}
        }
    }
    kind.ok_or_else(|| {
        PluginError::WrongWorld(format!(
            "the component exports neither {BALANCER}@{CONTRACT_MAJOR}.x nor {CONSISTENCY}@{CONTRACT_MAJOR}.x"
        ))
    })
}
