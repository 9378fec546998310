//! Kernel programs of the observer. The programs themselves live in `main.rs`, built for
//! `bpfel-unknown-none` by the agent's build script; this library target exists so the agent
//! can name the crate as a build dependency and cargo rebuilds it when the programs change.
#![no_std]
