//! Types shared by the kernel side (`mbcas-ebpf`) and user space (`mbcas-daemon`).
#![no_std]
