//! `dispatcher token`: signing keys and credentials.

use anyhow::{Context, Result};
use chrono::Utc;
use clap::Subcommand;
use dispatcher::tokens::{self, Keyring};
use std::path::PathBuf;
use uuid::Uuid;

use super::*;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Generate an Ed25519 signing key: PATH (private) and PATH.pub (public).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Mint a worker credential.
    Worker {
        #[command(flatten)]
        keys: KeyArgs,
        #[arg(long)]
        worker_id: String,
        #[arg(long, default_value_t = 24)]
        ttl_hours: i64,
    },
    /// Mint a user token for acting in one org.
    User {
        #[command(flatten)]
        keys: KeyArgs,
        #[arg(long)]
        user_id: Uuid,
        #[arg(long)]
        org_id: Uuid,
        #[arg(long, default_value_t = 1)]
        ttl_hours: i64,
    },
}

pub(crate) fn token(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Keygen { out } => {
            let (private, public) = tokens::generate_key_pem();
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            write_private(&out, &private)?;
            std::fs::write(&pub_path, public)
                .with_context(|| format!("writing {}", pub_path.display()))?;
            let ring = Keyring::from_pem("dispatcher", &private, &[], 0)?;
            println!("{}", ring.signing_kid());
            eprintln!(
                "wrote {} and {} (kid above)",
                out.display(),
                pub_path.display()
            );
        }
        TokenCommand::Worker {
            keys,
            worker_id,
            ttl_hours,
        } => {
            let ring = keys.keyring(0)?;
            let id = dispatcher::domain::worker_id(&worker_id)?;
            println!(
                "{}",
                ring.mint_worker(&id, Utc::now() + chrono::Duration::hours(ttl_hours))
            );
        }
        TokenCommand::User {
            keys,
            user_id,
            org_id,
            ttl_hours,
        } => {
            let ring = keys.keyring(0)?;
            println!(
                "{}",
                ring.mint_user(
                    user_id,
                    org_id,
                    Utc::now() + chrono::Duration::hours(ttl_hours)
                )
            );
        }
    }
    Ok(())
}

pub(crate) fn write_private(path: &PathBuf, pem: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}
