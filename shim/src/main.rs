use std::process::ExitCode;

use clap::Parser;
use vmesh_shim::cli::{CaptureCommand, Cli, Command};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the cause chain on one line, without a backtrace dump.
            eprintln!("vmesh-shim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.run),
        Some(Command::Status(args)) => Ok(vmesh_shim::status::print(&args)?),
        Some(Command::Capture(CaptureCommand::Install(args))) => {
            vmesh_shim::init_logging("info");
            Ok(vmesh_shim::capture::install(&args)?)
        }
        Some(Command::Capture(CaptureCommand::Remove(args))) => {
            vmesh_shim::init_logging("info");
            Ok(vmesh_shim::capture::remove(&args)?)
        }
    }
}

fn serve(args: vmesh_shim::config::RunArgs) -> anyhow::Result<()> {
    vmesh_shim::init_logging(&args.log_level);
    let settings = args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Before anything binds: a SIGTERM during start-up still ends in a clean stop.
        let signal = vmesh_shim::shutdown_signal();
        vmesh_shim::run(settings, signal).await
    })?;
    Ok(())
}
