//! `dispatcher bundle`: pack, push and tag UDF bundles through the API.

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::*;

#[derive(Subcommand)]
pub(crate) enum BundleCommand {
    /// Pack DIR (which holds a `bundle.json`) and push it; prints its
    /// digest (`sha256:…`), which tasks name as their `bundle`.
    Push {
        dir: std::path::PathBuf,
        /// Also point this tag at the pushed bundle.
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pack DIR and print the digest it would have, pushing nothing.
    Digest { dir: std::path::PathBuf },
    /// Point TAG at DIGEST (one of the org's bundles).
    Tag {
        tag: String,
        digest: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub(crate) async fn bundle(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Digest { dir } => {
            let (bytes, _) = dispatcher::bundles::pack(&dir)
                .with_context(|| format!("packing {}", dir.display()))?;
            println!("{}", dispatcher::bundles::digest(&bytes));
        }
        BundleCommand::Push { dir, tag, api } => {
            let view = push_bundle(&api, &dir, tag.as_deref()).await?;
            println!("{}", view.digest);
        }
        BundleCommand::Tag { tag, digest, api } => {
            tag_bundle(&api, &tag, &digest).await?;
            println!("{digest}");
        }
    }
    Ok(())
}

/// Packs `dir`, pushes it through the API and, if given, tags it.
pub(crate) async fn push_bundle(
    api: &ApiArgs,
    dir: &std::path::Path,
    tag: Option<&str>,
) -> Result<dispatcher_wire::BundleView> {
    let (bytes, manifest) =
        dispatcher::bundles::pack(dir).with_context(|| format!("packing {}", dir.display()))?;
    let size = bytes.len();
    let view: dispatcher_wire::BundleView = api_call(
        api,
        reqwest::Method::POST,
        "/v1/bundles",
        Some(("application/gzip", bytes)),
    )
    .await?;
    eprintln!(
        "pushed a {} bundle ({} bytes, handler {})",
        manifest.runtime.as_str(),
        size,
        manifest.handler
    );
    if let Some(tag) = tag {
        tag_bundle(api, tag, &view.digest).await?;
        eprintln!("tagged {tag}");
    }
    Ok(view)
}

pub(crate) async fn tag_bundle(api: &ApiArgs, tag: &str, digest: &str) -> Result<()> {
    let body = serde_json::to_vec(&dispatcher_wire::BundleTagRequest {
        digest: digest.to_owned(),
    })?;
    let _: dispatcher_wire::BundleView = api_call(
        api,
        reqwest::Method::PUT,
        &format!("/v1/bundles/tags/{tag}"),
        Some(("application/json", body)),
    )
    .await?;
    Ok(())
}

/// One call of the user API; a refusal becomes an error with its code.
pub(crate) async fn api_call<T: serde::de::DeserializeOwned>(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Result<T> {
    let url = format!("{}{path}", api.url.trim_end_matches('/'));
    let mut req = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(&api.token);
    if let Some(org) = &api.org {
        req = req.header("dispatcher-org", org);
    }
    if let Some((content_type, bytes)) = body {
        req = req.header("content-type", content_type).body(bytes);
    }
    let resp = req.send().await.with_context(|| format!("calling {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{url} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url} answered {text:?}"))
}
