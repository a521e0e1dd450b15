//! Compiles the CUDA kernels (`src/kernels/cuda/*.cu`) to PTX with nvcc, into OUT_DIR, when the
//! `cuda` feature is on; does nothing otherwise (a build without the feature needs no CUDA).
//!
//! nvcc: `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH. Target: `$CUDA_ARCH` (default
//! `sm_90`, H100/H200). Extra flags: `$NVCC_FLAGS` (whitespace-separated, e.g. `-ccbin g++-12`).
//! No `--use_fast_math`: the kernels keep IEEE expf / tanhf / sqrtf for parity with the CPU.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: [&str; 8] = ["gemv", "ffn", "attention", "norm", "elementwise", "stats", "weights", "sample"];
const DIR: &str = "src/kernels/cuda";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for v in ["NVCC", "CUDA_HOME", "CUDA_ARCH", "NVCC_FLAGS", "PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let nvcc = nvcc_path();
    let arch = env::var("CUDA_ARCH").unwrap_or_else(|_| "sm_90".to_string());
    println!("cargo:rustc-env=TDA_CUDA_ARCH={arch}");
    let extra: Vec<String> = env::var("NVCC_FLAGS").unwrap_or_default().split_whitespace().map(String::from).collect();
    let header = Path::new(DIR).join("common.cuh");
    println!("cargo:rerun-if-changed={}", header.display());
    for name in KERNELS {
        let src = Path::new(DIR).join(format!("{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        let out = out_dir.join(format!("{name}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx")
            .arg(format!("-arch={arch}"))
            .arg("-std=c++17")
            .arg("-O3")
            .arg("-I")
            .arg(DIR)
            .args(&extra)
            .arg(&src)
            .arg("-o")
            .arg(&out);
        let output = cmd.output().unwrap_or_else(|e| {
            panic!(
                "could not run nvcc ({}): {e}.\nThe `cuda` feature compiles the kernels with nvcc. Install the CUDA 13 \
                 compiler, e.g. `pip install nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
                 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85`, and set \
                 NVCC=<site-packages>/nvidia/cu13/bin/nvcc (or CUDA_HOME, or put nvcc on PATH).",
                nvcc.display()
            )
        });
        if !output.status.success() {
            panic!(
                "nvcc failed on {}:\n{:?}\n{}\n{}",
                src.display(),
                cmd,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// `$NVCC`, `$CUDA_HOME/bin/nvcc`, or the first `nvcc` on PATH; plain `nvcc` (for the error
/// message) when none is found.
fn nvcc_path() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(h) = env::var_os("CUDA_HOME") {
        let p = Path::new(&h).join("bin").join("nvcc");
        if p.is_file() {
            return p;
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
