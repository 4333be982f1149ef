//! The `dispatcher` binary: a thin CLI over the library (`cli/`).

mod cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::main().await
}
