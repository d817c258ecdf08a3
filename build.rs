//! Names the platform conditions once, as cfgs the crate tests everywhere:
//!
//! | cfg | set when |
//! |---|---|
//! | `percpu_ref_model` | a model checker drives the crate (`--cfg percpu_ref_loom` or `--cfg percpu_ref_shuttle`): no syscalls, no asm, the `sync` shim's model types |
//! | `percpu_ref_linux` | Linux, not Miri, not a model checker: syscalls and sysfs are available |
//! | `percpu_ref_rseq` | `percpu_ref_linux` with glibc on x86_64 or aarch64: the rseq tier is compiled in (chosen at run time) |

use std::env;

fn main() {
    for cfg in ["percpu_ref_model", "percpu_ref_linux", "percpu_ref_rseq"] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    println!("cargo::rerun-if-changed=build.rs");
    // `--cfg` flags from RUSTFLAGS reach build scripts as CARGO_CFG_*.
    let has = |name: &str| env::var_os(format!("CARGO_CFG_{}", name.to_uppercase())).is_some();
    let var =
        |name: &str| env::var(format!("CARGO_CFG_{}", name.to_uppercase())).unwrap_or_default();

    let model = has("percpu_ref_loom") || has("percpu_ref_shuttle");
    let linux = var("target_os") == "linux" && !has("miri") && !model;
    let rseq = linux
        && var("target_env") == "gnu"
        && matches!(var("target_arch").as_str(), "x86_64" | "aarch64");

    if model {
        println!("cargo::rustc-cfg=percpu_ref_model");
    }
    if linux {
        println!("cargo::rustc-cfg=percpu_ref_linux");
    }
    if rseq {
        println!("cargo::rustc-cfg=percpu_ref_rseq");
    }
}
