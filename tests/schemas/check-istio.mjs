// Checks Istio resources against Istio's CRD schemas, as the API server would on `kubectl
// apply`: the ajv validators @kubernetes-models/istio generates from each CRD's
// openAPIV3Schema (package.json says which Istio release), plus the one rule the API server
// applies to every object, that metadata.name is a DNS subdomain.
//
// Input on stdin: a JSON array of resources (tests/src/istio/schema.rs converts the YAML:
// Node has no YAML parser here and this directory takes no extra dependency for one).
// Output: one JSON line per resource, in order: {"ok":true} or {"errors":["PATH: what",...]}.
// Exit status 0 when every resource passed, 1 when one did not, 2 when the input is unusable.
//
// What this does not catch: an unknown field. The CRD validators accept them (the API server
// prunes them silently), so the strict check is the TypeScript one (schema.rs runs tsc).

import { EnvoyFilter } from "@kubernetes-models/istio/networking.istio.io/v1alpha3/EnvoyFilter";
import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin";

// By kind only: the class's validator then refuses a wrong apiVersion itself, with the
// versions it serves in the message.
const models = { EnvoyFilter, WasmPlugin };

const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

function check(resource) {
  if (resource === null || typeof resource !== "object" || Array.isArray(resource)) {
    return ["/: not an object"];
  }
  const errors = [];
  const name = resource.metadata?.name;
  if (typeof name !== "string" || name.length > 253 || !DNS_SUBDOMAIN.test(name)) {
    errors.push(`/metadata/name: ${JSON.stringify(name)} is not a DNS subdomain`);
  }
  const Model = Object.hasOwn(models, resource.kind) ? models[resource.kind] : undefined;
  if (!Model) {
    errors.push(`/kind: ${JSON.stringify(resource.kind)} is not one of ${Object.keys(models)}`);
    return errors;
  }
  try {
    new Model(resource).validate();
  } catch (e) {
    const found = Array.isArray(e.errors) ? e.errors : [];
    if (found.length === 0) errors.push(`/: ${e.message}`);
    for (const f of found) {
      const allowed = f.params?.allowedValues;
      const also = Array.isArray(allowed) ? ` (${allowed.join(", ")})` : "";
      errors.push(`${f.instancePath || "/"}: ${f.message}${also}`);
    }
  }
  return errors;
}

let input = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) input += chunk;
let resources;
try {
  resources = JSON.parse(input);
} catch (e) {
  console.error(`stdin is not JSON: ${e.message}`);
  process.exit(2);
}
if (!Array.isArray(resources)) {
  console.error("stdin is not a JSON array of resources");
  process.exit(2);
}
let failed = false;
for (const r of resources) {
  const errors = check(r);
  failed ||= errors.length > 0;
  console.log(JSON.stringify(errors.length ? { errors } : { ok: true }));
}
process.exit(failed ? 1 : 0);
