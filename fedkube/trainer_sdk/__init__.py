"""What training scripts import: receive, send, log."""
