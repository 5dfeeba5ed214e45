"""The command lines (score, generate, icl, demo) and the options they share."""
