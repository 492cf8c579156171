#![no_std]
// This file exists so that `cargo` treats the crate as a library dependency of
// mbcas-daemon's build script; the programs live in main.rs.
