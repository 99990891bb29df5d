//! Istio's CRD schemas, as the API server applies them on `kubectl apply --validate=strict`,
//! taken from `tests/schemas/` (`@kubernetes-models/istio`, generated from the CRDs of the
//! Istio release its package.json names; pinned by package-lock.json, installed by
//! `scripts/setup.sh`). Nothing of Istio's is committed here: the checks run the installed
//! package.
//!
//! Two checks, because the package's validators alone are not strict:
//! - [`crd_check`]: the ajv validator of each kind (`tests/schemas/check-istio.mjs`): types,
//!   enums, the served `apiVersion`, and `metadata.name` a DNS subdomain. CRD schemas leave
//!   objects open, and so do these validators: a misspelt field passes them (the API server
//!   would prune it without a word);
//! - [`unknown_field_check`]: each resource as a TypeScript constant of the package's type for
//!   its kind (`const r: IEnvoyFilter = {...}`), compiled by `tsc --noEmit --strict`. An object
//!   literal's excess-property check (TS2353, TS2561 with a "did you mean") is what refuses an
//!   unknown field, as strict validation does; the open parts of the CRDs (an EnvoyFilter's
//!   `patch.value`, a WasmPlugin's `pluginConfig`) are typed `{}` and stay open.
//!
//! Both return, per resource and in order, what is wrong with it (empty: nothing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use vmesh_test_support::{repo_root, TempDir};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0} is missing: run scripts/setup.sh (npm ci in tests/schemas)")]
    NotInstalled(PathBuf),
    #[error("run {program}: {reason}")]
    Run { program: String, reason: String },
    #[error("{program} answered something other than a result per resource: {output}")]
    Output { program: String, output: String },
}

/// The kinds the checks know: kind, the package module that types it, the type's name.
const KINDS: &[(&str, &str, &str)] = &[
    (
        "EnvoyFilter",
        "@kubernetes-models/istio/networking.istio.io/v1alpha3/EnvoyFilter",
        "IEnvoyFilter",
    ),
    (
        "WasmPlugin",
        "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin",
        "IWasmPlugin",
    ),
];

pub fn schemas_dir() -> PathBuf {
    repo_root().join("tests/schemas")
}

fn installed(relative: &str) -> Result<PathBuf, SchemaError> {
    let p = schemas_dir().join(relative);
    if p.exists() {
        Ok(p)
    } else {
        Err(SchemaError::NotInstalled(p))
    }
}

/// The CRD schema's verdict on each resource (module docs).
pub fn crd_check(resources: &[Value]) -> Result<Vec<Vec<String>>, SchemaError> {
    installed("node_modules/@kubernetes-models/istio")?;
    let script = schemas_dir().join("check-istio.mjs");
    let run = |reason: String| SchemaError::Run {
        program: "node".into(),
        reason,
    };
    let mut child = Command::new("node")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| run(e.to_string()))?;
    let input = serde_json::to_vec(resources).map_err(|e| run(e.to_string()))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or_else(|| run("no stdin".into()))?;
        stdin.write_all(&input).map_err(|e| run(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| run(e.to_string()))?;
    // 0: all passed, 1: one did not; anything else (2, a crash) is the check failing.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(run(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    parse_crd_check(&String::from_utf8_lossy(&out.stdout), resources.len())
}

/// check-istio.mjs's answer: one JSON line per resource, `{"ok":true}` or `{"errors":[...]}`.
pub fn parse_crd_check(stdout: &str, count: usize) -> Result<Vec<Vec<String>>, SchemaError> {
    let bad = || SchemaError::Output {
        program: "check-istio.mjs".into(),
        output: stdout.to_string(),
    };
    let verdicts = stdout
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).map_err(|_| bad())?;
            if v.get("ok") == Some(&Value::Bool(true)) {
                return Ok(Vec::new());
            }
            v.get("errors")
                .and_then(Value::as_array)
                .filter(|e| !e.is_empty())
                .map(|e| {
                    e.iter()
                        .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_string))
                        .collect()
                })
                .ok_or_else(bad)
        })
        .collect::<Result<Vec<Vec<String>>, _>>()?;
    if verdicts.len() == count {
        Ok(verdicts)
    } else {
        Err(bad())
    }
}

/// The TypeScript source that types `resource` as its kind, or why there is none.
pub fn typescript_source(resource: &Value) -> Result<String, String> {
    let kind = resource.get("kind").and_then(Value::as_str);
    let (_, module, ty) = KINDS
        .iter()
        .find(|(k, _, _)| Some(*k) == kind)
        .ok_or_else(|| format!("/kind: {kind:?} is not a kind this check knows"))?;
    // JSON is a TypeScript expression; an object literal keeps the excess-property check.
    Ok(format!(
        "import type {{ {ty} }} from \"{module}\";\nexport const r: {ty} = {resource};\n"
    ))
}

/// File name of the `i`th resource's source, which tsc's diagnostics start with.
fn source_name(i: usize) -> String {
    format!("r{i}.ts")
}

/// The strict (unknown fields refused) check of each resource (module docs).
pub fn unknown_field_check(resources: &[Value]) -> Result<Vec<Vec<String>>, SchemaError> {
    installed("node_modules/@kubernetes-models/istio")?;
    let tsc = installed("node_modules/.bin/tsc")?;
    let dir = TempDir::new();
    // The sources import the package by name: node_modules beside them resolves it.
    std::os::unix::fs::symlink(
        schemas_dir().join("node_modules"),
        dir.path().join("node_modules"),
    )
    .map_err(|e| SchemaError::Run {
        program: "tsc".into(),
        reason: format!("link node_modules: {e}"),
    })?;
    let mut verdicts = vec![Vec::new(); resources.len()];
    let mut files = Vec::new();
    for (i, r) in resources.iter().enumerate() {
        match typescript_source(r) {
            Ok(source) => files.push(dir.file(&source_name(i), &source)),
            Err(why) => verdicts[i].push(why),
        }
    }
    if files.is_empty() {
        return Ok(verdicts);
    }
    let out = Command::new(&tsc)
        .current_dir(dir.path())
        .args([
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--pretty",
            "false",
            "--lib",
            "es2020",
            "--module",
            "esnext",
            "--moduleResolution",
            "bundler",
        ])
        .args(&files)
        .output()
        .map_err(|e| SchemaError::Run {
            program: tsc.display().to_string(),
            reason: e.to_string(),
        })?;
    let found = parse_tsc(&String::from_utf8_lossy(&out.stdout), dir.path())?;
    for (i, diagnostic) in found {
        if let Some(v) = verdicts.get_mut(i) {
            v.push(diagnostic);
        }
    }
    Ok(verdicts)
}

/// tsc's `--pretty false` diagnostics (`r3.ts(2,40): error TS2353: ...`), each with the index
/// of the resource it is about. A diagnostic about no resource's file (a bad option, a missing
/// library) is the check failing, not a verdict.
pub fn parse_tsc(stdout: &str, dir: &Path) -> Result<Vec<(usize, String)>, SchemaError> {
    let prefix = format!("{}/", dir.display());
    let mut found: Vec<(usize, String)> = Vec::new();
    for line in stdout.lines() {
        let line = line.strip_prefix(prefix.as_str()).unwrap_or(line);
        let resource = line
            .strip_prefix('r')
            .and_then(|rest| rest.split_once(".ts("))
            .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
        match resource {
            Some((i, rest)) => {
                let message = rest.split_once("): ").map_or(rest, |(_, m)| m);
                found.push((i, message.to_string()));
            }
            // tsc continues a long message on indented lines.
            None if line.starts_with(' ') && !found.is_empty() => {
                if let Some((_, last)) = found.last_mut() {
                    last.push(' ');
                    last.push_str(line.trim());
                }
            }
            None if line.trim().is_empty() => {}
            None => {
                return Err(SchemaError::Output {
                    program: "tsc".into(),
                    output: stdout.to_string(),
                })
            }
        }
    }
    Ok(found)
}

/// Whether a tsc diagnostic is the excess-property check, i.e. an unknown field.
pub fn is_unknown_field(diagnostic: &str) -> bool {
    diagnostic.contains("TS2353") || diagnostic.contains("TS2561")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tsc_diagnostics_are_attributed_to_the_resource_of_their_file() {
        let dir = Path::new("/tmp/x");
        let out = "r1.ts(2,40): error TS2353: Object literal may only specify known properties\n  and more\n/tmp/x/r0.ts(2,9): error TS2322: Type 'string' is not assignable\n";
        let found = parse_tsc(out, dir).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, 1);
        assert!(is_unknown_field(&found[0].1) && found[0].1.ends_with("and more"));
        assert_eq!(found[1].0, 0);
        assert!(!is_unknown_field(&found[1].1));
    }

    #[test]
    fn a_tsc_diagnostic_about_no_resource_is_an_error_not_a_verdict() {
        let out = "error TS5023: Unknown compiler option '--bogus'.\n";
        assert!(matches!(
            parse_tsc(out, Path::new("/tmp/x")),
            Err(SchemaError::Output { .. })
        ));
    }

    #[test]
    fn the_crd_check_answer_must_have_one_verdict_per_resource() {
        let out = "{\"ok\":true}\n{\"errors\":[\"/spec/type: must be equal to one of the allowed values\"]}\n";
        let v = parse_crd_check(out, 2).unwrap();
        assert!(v[0].is_empty());
        assert_eq!(v[1].len(), 1);
        assert!(parse_crd_check(out, 3).is_err());
        assert!(parse_crd_check("{\"errors\":[]}\n", 1).is_err());
    }

    #[test]
    fn a_resource_of_an_unknown_kind_has_no_typescript_source() {
        let src = typescript_source(&json!({"kind": "WasmPlugin", "spec": {}})).unwrap();
        assert!(src.contains("const r: IWasmPlugin = {\"kind\":\"WasmPlugin\""));
        assert!(typescript_source(&json!({"kind": "Sidecar"})).is_err());
    }
}
