//! `vmesh-demo`: shows the multi-network scenario (scripts/demo.sh builds and runs it).

fn main() -> anyhow::Result<()> {
    vmesh_demo::interrupt::install()?;
    let report = vmesh_demo::run(&vmesh_demo::Options::default())?;
    println!(
        "\ndone: {} WorkloadEntries, {} requests answered, everything removed",
        report.entries.len(),
        report.answers.len()
    );
    Ok(())
}
