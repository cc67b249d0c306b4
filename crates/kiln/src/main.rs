//! `kiln`: a self-hosted code interpreter speaking the Together Code
//! Interpreter API.
//!
//! This binary is thin: it parses the command line and configuration, then
//! hands over to the library crates (`kiln-server` for HTTP,
//! `kiln-sessions` for kernels, `kiln-runtime` for the Python environment).
#![forbid(unsafe_code)]

mod admin;
mod ceiling;
mod choices;
mod client;
mod config;
mod fds;
mod http;
mod mcp;
mod nodes;
mod serve;
mod table;

use clap::{Parser, Subcommand};

/// A self-hosted code interpreter: runs untrusted Python (and JavaScript,
/// TypeScript and bash) in stateful Jupyter sessions behind the Together
/// Code Interpreter API.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service (provisions the runtime on first start).
    Serve(Box<config::ServeArgs>),
    /// Manage the runtime sessions run in (Python, its packages, and the
    /// other languages' kernels).
    #[command(subcommand)]
    Runtime(RuntimeCommand),
    /// Run code on a kiln server and print what it shows (exit 1 if it raised).
    Exec(Box<client::ExecArgs>),
    /// List or end your sessions on a kiln server.
    #[command(subcommand)]
    Sessions(client::SessionsCommand),
    /// Manage API keys in the data directory (operator).
    #[command(subcommand)]
    Keys(admin::KeysCommand),
    /// Serve MCP over stdio (for desktop clients that spawn it): against the
    /// kiln at --url, or, without one, against its own embedded kiln.
    Mcp(mcp::McpArgs),
    /// Usage per API key: sessions, executions, CPU, memory (operator).
    Usage {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: admin::DataDir,
    },
    /// The nodes of a cluster, from the database they share: state, address,
    /// ready kernels, sessions, free memory, lease (operator).
    Nodes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: admin::DataDir,
    },
}

#[derive(Debug, Subcommand)]
enum RuntimeCommand {
    /// Build (or verify) the runtime ahead of time.
    Build(config::RuntimeArgs),
}

fn main() -> anyhow::Result<()> {
    // The sandbox helper: must run before anything starts a thread (it
    // forks and unshares namespaces), so it bypasses clap and tokio.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "__sandbox-init") {
        kiln_sandbox::helper_main(args);
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => {
            let settings = config::Settings::resolve(*args)?;
            serve::init_logging(settings.log_format);
            for w in &settings.warnings {
                tracing::warn!("{w}");
            }
            rt.block_on(serve::serve(settings))
        }
        Command::Runtime(RuntimeCommand::Build(args)) => {
            serve::init_logging(choices::LogFormat::Text);
            let cfg = args.runtime_config()?;
            let mut progress = kiln_runtime::Progress::auto();
            let runtime = rt.block_on(async move {
                tokio::task::spawn_blocking(move || kiln_runtime::ensure(&cfg, &mut progress)).await
            })??;
            println!("runtime ready: {}", runtime.root.display());
            println!("kernel package: {}", runtime.kernel_package_dir().display());
            Ok(())
        }
        Command::Exec(args) => {
            let code = rt.block_on(client::exec(*args))?;
            std::process::exit(code)
        }
        Command::Sessions(cmd) => rt.block_on(client::sessions(cmd)),
        Command::Keys(cmd) => rt.block_on(admin::keys(cmd)),
        Command::Usage { json, data } => rt.block_on(admin::usage(json, data)),
        Command::Nodes { json, data } => rt.block_on(nodes::nodes(json, data)),
        Command::Mcp(args) => {
            serve::init_logging(choices::LogFormat::Text);
            rt.block_on(mcp::run(args))
        }
    }
}
