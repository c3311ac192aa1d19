"""Composable stages: momentum -> orthogonalize -> second moment -> scale -> decay."""
