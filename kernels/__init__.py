BACKEND = "k"
