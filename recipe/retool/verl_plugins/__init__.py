"""What verl loads from this repo by path: the reward, the reward manager and the code tool."""
