use std::process::ExitCode;

use clap::Parser;

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
    let cli = vmesh_shim::config::Cli::parse();
    vmesh_shim::init_logging(&cli.log_level);
    let settings = cli.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(vmesh_shim::run(settings, vmesh_shim::shutdown_signal()))?;
    Ok(())
}
