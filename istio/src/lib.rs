//! vmesh-istio: Istio semantics with no I/O, used by the control plane.
//!
//! The config model ([`model`]) and its validation ([`validate`]), WorkloadEntry
//! auto-registration, liveness and health ([`workload`]), service selection and port mapping
//! ([`select`]), VIP allocation ([`vip`]), name-table assembly ([`names`]) and meshNetworks'
//! east-west gateways ([`networks`]).
//!
//! Data flows one way: the control plane decodes YAML into [`model`] objects, checks them with
//! [`validate::validate`], turns registrations into WorkloadEntries with [`workload`], and builds
//! each namespace's [`vmesh_api::names::NameTable`] from the whole set with
//! [`names::MeshNames`]. Clocks and storage stay outside: every function takes times as
//! nanoseconds since the epoch (RFC 3339 text as Kubernetes writes it is
//! [`vmesh_api::time`], shared with the shim).
//!
//! This is a crate of its own so that what the filter links (`vmesh-core`, and `vmesh-api`
//! without its `native` feature) stays free of serde_json, which the Istio model needs.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod cluster_ip;
pub mod labels;
pub mod model;
pub mod names;
pub mod networks;
pub mod select;
pub mod validate;
pub mod vip;
pub mod workload;
