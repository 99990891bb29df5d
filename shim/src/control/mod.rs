//! The shim as the control plane's client: the VM's identity token ([`token`]), the HTTPS
//! client ([`client`]), the registration session that keeps the VM's WorkloadEntry alive and
//! its health current ([`session`]), and the name table long-poll with its on-disk cache
//! ([`tables`]).

pub mod client;
pub mod session;
pub mod tables;
pub mod token;
