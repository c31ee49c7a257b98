from trainkit.entry import entry_point

if __name__ == "__main__":  # not when a spawned worker process (trainkit tune --workers) imports it
    entry_point()
