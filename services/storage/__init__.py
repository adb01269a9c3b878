"""What is kept on disk: images, datasets, the job database, results, owners' folders, atomic files."""
