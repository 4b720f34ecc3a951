from vlcache_sglang.model_dir.cli import main

main()
