//! `vmesh-demo`: shows the multi-network scenario (scripts/demo.sh builds and runs it).

use std::process::ExitCode;

fn main() -> anyhow::Result<ExitCode> {
    vmesh_demo::interrupt::install()?;
    match vmesh_demo::run(&vmesh_demo::Options::default()) {
        Ok(report) => {
            println!(
                "\ndone: {} WorkloadEntries, {} requests answered, everything removed",
                report.entries.len(),
                report.answers.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(vmesh_demo::DemoError::Interrupted) => {
            eprintln!("interrupted; everything removed");
            // The shell's code for a program ended by SIGINT.
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e.into()),
    }
}
