use std::process::ExitCode;

fn main() -> ExitCode {
    match vmesh_control::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the cause chain on one line, without a backtrace dump.
            eprintln!("vmesh-control: {e:#}");
            ExitCode::FAILURE
        }
    }
}
