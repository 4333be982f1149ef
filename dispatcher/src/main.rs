//! The `dispatcher` binary: a thin CLI over the library (`cli/`).

mod cli;

/// Runs the command; an error is one line (`error: …` with its causes),
/// whatever `RUST_BACKTRACE` says; `DISPATCHER_DEBUG=1` adds the backtrace.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match cli::main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if std::env::var_os("DISPATCHER_DEBUG").is_some_and(|v| v == "1") {
                eprintln!("{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}
