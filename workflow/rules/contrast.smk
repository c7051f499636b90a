# Image-contrast stage for mDPO / SymMPO (placeholder until the rule lands).
