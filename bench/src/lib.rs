//! Shared pieces of Warren's benchmark binaries (`src/bin/*.rs`): each
//! binary measures one area side by side with its baseline and prints a
//! markdown table.
