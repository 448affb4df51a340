//! x
pub mod bus;
pub mod host;
pub mod layout;
pub mod mix;
pub mod ram;
pub mod schedule;
pub mod seam;
pub mod slots;
pub mod tlb;
