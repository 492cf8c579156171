//! The DaemonSet's command line is one `mbcas` accepts: manifests and `--help`
//! cannot drift apart.

use clap::Parser as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use mbcas::{
    cli::{Cli, Command},
    run::Mode,
};

#[test]
fn daemonset_args_parse() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ds: DaemonSet = serde_saphyr::from_str(&text).unwrap();
    let spec = ds.spec.and_then(|s| s.template.spec).expect("no pod spec");
    let c = spec
        .containers
        .iter()
        .find(|c| c.name == "mbcas")
        .expect("no mbcas container");
    let mut argv = vec!["mbcas".to_owned()];
    argv.extend(c.command.clone().unwrap_or_default().into_iter().skip(1));
    // `$(VAR)` is expanded by the kubelet; stand in a value.
    argv.extend(c.args.clone().unwrap_or_default().into_iter().map(|a| {
        if a.starts_with("$(") {
            "node-a".to_owned()
        } else {
            a
        }
    }));
    let cli = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("DaemonSet args {argv:?} rejected: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("DaemonSet does not run `mbcas run`: {argv:?}")
    };
    assert_eq!(run.mode, Mode::Kubernetes);
    assert_eq!(run.kubernetes.node_name.as_deref(), Some("node-a"));
    run.decision
        .validate()
        .unwrap_or_else(|e| panic!("DaemonSet decision flags invalid: {e}"));
}
