from services.database.service import main

main()
