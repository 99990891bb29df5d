//! vmesh-control: the control plane that lets VMs join the mesh.
//!
//! Config (Istio WorkloadGroup / WorkloadEntry / ServiceEntry and Kubernetes Service YAML) comes
//! in through `apply` ([`config`]) and lands in a [`store`]. A VM registers over HTTPS with a
//! service-account token ([`identity`]); the [`registry`] turns its WorkloadGroup into a
//! WorkloadEntry (semantics in `vmesh_istio`), tracks its liveness and health, and
//! cleans it up. Every change flows from the store's watch into the in-memory [`cache`], from
//! which [`tables`] builds one name table per namespace and answers long-polls. [`api`] is the
//! HTTPS server, [`client`] the CLI's side of it; [`quota`] bounds what one identity may register.
//! [`ca`] signs workload certificates (Istio's `CreateCertificate`, on the same port) with the
//! CA of [`tls`].

pub mod activity;
pub mod api;
pub mod bundle;
pub mod ca;
pub mod cache;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod conns;
pub mod identity;
pub mod logsafe;
pub mod metrics;
pub mod quota;
pub mod random;
pub mod registry;
pub mod server;
pub mod shared;
pub mod store;
pub mod tables;
pub mod tls;
