//! `qcluster`: the cluster and its command line, with the built-in tasks.

fn main() -> std::process::ExitCode {
    cluster::cli::main(cluster::Registry::with_builtins())
}
