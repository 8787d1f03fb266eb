"""Small pure functions and thin modules shared by the backbones."""
