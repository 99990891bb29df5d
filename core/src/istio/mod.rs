//! Istio semantics with no I/O: the config model ([`model`]) and its validation ([`validate`]),
//! WorkloadEntry auto-registration, liveness and health ([`workload`]), service selection and
//! port mapping ([`select`]), VIP allocation ([`vip`]) and name-table assembly ([`names`]).
//!
//! Data flows one way: the control plane decodes YAML into [`model`] objects, checks them with
//! [`validate::validate`], turns registrations into WorkloadEntries with [`workload`], and builds
//! each namespace's [`crate::names::NameTable`] from the whole set with [`names::MeshNames`].
//! Clocks and storage stay outside: every function takes times as nanoseconds since the epoch.

pub mod labels;
pub mod model;
pub mod names;
pub mod select;
pub mod time;
pub mod validate;
pub mod vip;
pub mod workload;
