//! Builds the example plugins.
