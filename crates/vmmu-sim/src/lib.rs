//! x
pub mod bus;
pub mod host;
pub mod layout;
pub mod machine;
pub mod mix;
pub mod oracle;
pub mod ram;
pub mod reference;
pub mod report;
pub mod schedule;
pub mod seam;
pub mod slots;
pub mod tlb;
