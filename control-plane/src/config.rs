//! Reading Istio/Kubernetes manifests: multi-document YAML (or JSON) -> documents -> typed,
//! validated [`Resource`]s. Every refusal names the document (by file and 0-based index, as
//! kubectl counts) and the field path, and a refused batch applies nothing.

use serde::{Deserialize, Serialize};
use vmesh_istio::model::{Kind, Resource};
use vmesh_istio::validate::check;

/// One manifest document, as the CLI sends it to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Document {
    /// Where it came from (a file name, or "-").
    #[serde(default)]
    pub source: String,
    /// 0-based position among the documents of `source`.
    #[serde(default)]
    pub index: usize,
    pub object: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(rename_all = "camelCase")]
#[error("{source_name}: document {index}: {object}: {field}: {message}")]
pub struct ConfigError {
    #[serde(rename = "source")]
    pub source_name: String,
    pub index: usize,
    /// `Kind/name` of the refused object as far as it is known.
    pub object: String,
    /// Field path, kubectl style; empty when the document itself is unreadable.
    pub field: String,
    pub message: String,
}

/// Splits YAML (or JSON, which is YAML) text into documents; empty documents are skipped.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Document>, ConfigError> {
    let mut out = Vec::new();
    for (index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(de).map_err(|e| ConfigError {
            source_name: source.to_string(),
            index,
            object: String::new(),
            field: String::new(),
            message: format!("invalid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        out.push(Document {
            source: source.to_string(),
            index,
            object: value,
        });
    }
    Ok(out)
}

/// Decodes and validates one document. A missing namespace becomes `default_namespace`.
pub fn decode(doc: &Document, default_namespace: &str) -> Result<Resource, ConfigError> {
    decode_checked(doc, default_namespace).map(|(r, _)| r)
}

/// As [`decode`], with the warnings Istio's validation gives for an accepted object (in the
/// same shape as a refusal, so they name document and field).
pub fn decode_checked(
    doc: &Document,
    default_namespace: &str,
) -> Result<(Resource, Vec<ConfigError>), ConfigError> {
    let err = |kind: &str, name: &str, field: &str, message: String| ConfigError {
        source_name: doc.source.clone(),
        index: doc.index,
        object: if name.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}/{name}")
        },
        field: field.to_string(),
        message,
    };
    let obj = doc
        .object
        .as_object()
        .ok_or_else(|| err("", "", "", "a document must be a mapping".into()))?;
    let s = |f: &str| obj.get(f).and_then(|v| v.as_str()).unwrap_or_default();
    let (api_version, kind_name) = (s("apiVersion"), s("kind"));
    if api_version.is_empty() {
        return Err(err(
            kind_name,
            "",
            "apiVersion",
            "Required value: apiVersion not set".into(),
        ));
    }
    if kind_name.is_empty() {
        return Err(err("", "", "kind", "Required value: kind not set".into()));
    }
    let kind = Kind::from_manifest(api_version, kind_name)
        .map_err(|e| err(kind_name, "", "kind", e.to_string()))?;
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_string();
    let typed = |v: serde_json::Value| -> Result<Resource, ConfigError> {
        fn de<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
        ) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
            serde_path_to_error::deserialize(v)
        }
        let r = match kind {
            Kind::WorkloadGroup => de(v).map(|o| Resource::WorkloadGroup(Box::new(o))),
            Kind::WorkloadEntry => de(v).map(Resource::WorkloadEntry),
            Kind::ServiceEntry => de(v).map(|o| Resource::ServiceEntry(Box::new(o))),
            Kind::Service => de(v).map(Resource::Service),
        };
        r.map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            err(kind.as_str(), &name, &field, e.into_inner().to_string())
        })
    };
    let mut r = typed(doc.object.clone())?;
    let meta = r.meta_mut();
    if meta.namespace.is_empty() {
        meta.namespace = default_namespace.to_string();
    }
    let findings = check(&r);
    if let Some(first) = findings.errors.into_iter().next() {
        return Err(err(kind.as_str(), &name, &first.path, first.message));
    }
    let warnings = findings
        .warnings
        .into_iter()
        .map(|w| err(kind.as_str(), &name, &w.path, w.message))
        .collect();
    Ok((r, warnings))
}

/// Decodes every document or refuses the lot with the first problem.
pub fn decode_all(
    docs: &[Document],
    default_namespace: &str,
) -> Result<Vec<Resource>, ConfigError> {
    docs.iter().map(|d| decode(d, default_namespace)).collect()
}

/// As [`decode_all`], with every accepted document's warnings.
pub fn decode_all_checked(
    docs: &[Document],
    default_namespace: &str,
) -> Result<(Vec<Resource>, Vec<ConfigError>), ConfigError> {
    let mut resources = Vec::with_capacity(docs.len());
    let mut warnings = Vec::new();
    for d in docs {
        let (r, w) = decode_checked(d, default_namespace)?;
        resources.push(r);
        warnings.extend(w);
    }
    Ok((resources, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_error(yaml: &str) -> ConfigError {
        let docs = parse_documents("f.yaml", yaml).unwrap();
        decode_all(&docs, "default").unwrap_err()
    }

    #[test]
    fn multi_document_yaml_decodes_every_supported_version() {
        let yaml = r#"
apiVersion: networking.istio.io/v1alpha3
kind: WorkloadGroup
metadata:
  name: python-http
  namespace: vm-namespace
spec:
  metadata:
    labels:
      app: python-http
  template:
    serviceAccount: vm-sa
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: vmservice
spec:
  hosts: [vmservice.example.com]
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 9090}
  resolution: STATIC
  workloadSelector:
    labels: {app: python-http}
---
---
apiVersion: v1
kind: Service
metadata: {name: mysqldb, namespace: vm}
spec:
  ports: [{port: 3306, name: tcp}]
  selector: {app: mysqldb}
"#;
        let docs = parse_documents("f.yaml", yaml).unwrap();
        assert_eq!(docs.iter().map(|d| d.index).collect::<Vec<_>>(), [0, 1, 3]);
        let rs = decode_all(&docs, "default").unwrap();
        assert_eq!(
            rs.iter().map(|r| r.kind()).collect::<Vec<_>>(),
            [Kind::WorkloadGroup, Kind::ServiceEntry, Kind::Service]
        );
        assert_eq!(rs[1].meta().namespace, "default");
    }

    #[test]
    fn refusals_name_document_and_field() {
        let cases = [
            ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec:\n  hosts: [a.example.com]\n  ports: [{number: eighty, name: http}]\n",
             0, "spec.ports[0].number"),
            ("---\napiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {template: {}, tempalte: {}}\n",
             1, "spec.tempalte"),
            ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec:\n  hosts: [a.example.com]\n  resolution: MAGIC\n  ports: [{number: 80, name: http}]\n",
             0, "spec.resolution"),
            ("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: a}\nspec: {address: \"not an address!\"}\n", 0, "spec.address"),
            ("kind: Service\nmetadata: {name: a}\n", 0, "apiVersion"),
        ];
        for (yaml, index, field) in cases {
            let e = first_error(yaml);
            assert_eq!((e.index, e.field.as_str()), (index, field), "{e}");
        }
    }

    #[test]
    fn unknown_kinds_are_refused_by_name() {
        let e = first_error(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n",
        );
        assert!(e.message.contains("Gateway"), "{e}");
        assert_eq!(e.field, "kind");
    }

    #[test]
    fn malformed_yaml_is_refused_with_its_document() {
        let e = parse_documents("bad.yaml", "a: 1\n---\nb: [unclosed\n").unwrap_err();
        assert_eq!(e.index, 1);
        assert!(e.message.contains("invalid YAML"));
    }
}
