fn main() -> anyhow::Result<()> {
    vmesh_control::cli::main()
}
