//! The command line: running the shim (the default, flags in [`RunArgs`]), asking a running
//! shim what it knows (`status`), and installing or removing traffic capture (`capture`).

use clap::{Args, Parser, Subcommand};

use crate::config::RunArgs;

/// vmesh-shim: the VM-side helper of the vmesh filter in Envoy.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "vmesh-shim",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a command: run the shim.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print what the running shim knows: registration, health and why, name table, last
    /// contact with the control plane, last error.
    Status(StatusArgs),
    /// Send the VM's DNS, outbound and inbound traffic through Envoy (iptables), or undo it.
    #[command(subcommand)]
    Capture(CaptureCommand),
}

pub const ENV_STATUS_ADDR: &str = "VMESH_SHIM_LISTEN";

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Where the running shim listens.
    #[arg(long, env = ENV_STATUS_ADDR, default_value = crate::config::DEFAULT_LISTEN, value_name = "IP:PORT")]
    pub listen: String,
    /// Print the status as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CaptureCommand {
    /// Install the capture rules, or replace them with the current settings' (idempotent).
    Install(Box<crate::capture::CaptureArgs>),
    /// Remove every vmesh chain and jump, and nothing else.
    Remove(crate::capture::RemoveArgs),
}
