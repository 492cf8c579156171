use clap::Parser as _;
use mbcas::cli::Cli;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
